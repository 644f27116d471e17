"""Offline conversion (model vendor side): TFLite graph layer, partition, obfuscation schemes, artifacts."""
