"""edge-inspect runtime: sources, wire format, engines, pipeline, metrics.

This package must import with only numpy, opencv, pyzmq, prometheus-client and
onnxruntime installed: it is what runs on a Jetson. Never import torch, ``trainer`` or
``export`` at module level here.
"""

__version__ = "0.1.0"
