"""The model zoo: Keras builders of the ShadowNet paper's models, exported to float32 .tflite.

- ``models.zoo``: ``NAMES``, ``build_keras(name, seed)``, ``export(name, path, seed=0, train=None)``,
  ``op_counts(tflite)``; importing it does not import TensorFlow.
- ``models.yolo``: decoding and non-maximum suppression of YOLOv4-tiny's heads (NumPy only).
- ``models.digits``: MiniVGG trained on scikit-learn's handwritten digits, and its test split format.
- ``models.calibrate``: He initialisation and calibrated batch norms that make random weights behave.
- One module per family (``mobilenet``, ``resnet``, ``minivgg``, ``yolov4_tiny``); ``models.backend``
  is the one place TensorFlow is imported.
"""
