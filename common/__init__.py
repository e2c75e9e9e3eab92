"""Shared mechanics for the cleansd scripts: data, models, rollout, log-probs, verifiers, FSDP2, I/O."""
