"""Ray actors: thin shells around the plain classes in each module."""
