"""The model zoo: Keras builders of the ShadowNet paper's models, exported to float32 .tflite."""
