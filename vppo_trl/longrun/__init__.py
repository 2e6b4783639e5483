"""What keeps long runs alive: exact resume, the non-finite-loss guard, image-less processes under ZeRO-3/FSDP,
dynamic sampling. Each is a mixin of VPPOTrainer."""
