"""ofs_scale: distributed transformer training that measures and minimises outlier features."""

__version__ = "0.1.0"
