"""Process groups (megatron-core parallel_state) and pipeline stages."""

from ofs_scale.parallel.mesh import Mesh, destroy_mesh, init_mesh

__all__ = ["Mesh", "destroy_mesh", "init_mesh"]
