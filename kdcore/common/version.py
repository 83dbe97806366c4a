"""kdcore's version (``kdcore.__version__``)."""

VERSION = "0.1.0"
