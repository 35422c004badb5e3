"""The DICOM node: networking, ingest, the processing pipeline and the CLI.

The only package that wires ``inference`` and ``storage`` together.
"""

__version__ = "0.1.0"
