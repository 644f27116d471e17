"""A simulated Trusted Execution Environment with OP-TEE / GlobalPlatform vocabulary."""
