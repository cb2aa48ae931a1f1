"""What decides a reward: answer verification and the code sandbox."""
