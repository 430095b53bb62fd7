"""What GeRe reads off a model: wrapping (accelerate / DDP / PEFT / sharding), its text config, its
hidden states, the frozen reference it compares against, and the bottom-layer freeze."""
