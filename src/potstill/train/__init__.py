"""Training loops on accelerate: SFT, distillation, the RLT warm-up."""
