"""zaya-rl: RL post-training of reasoning MoE models on Ray, with vLLM and DeepSpeed."""
