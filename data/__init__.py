import os

# TensorFlow (read by TFDS and TensorBoard) logs C++ notices at import; keep them out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
