"""Plain PyTorch model code; parallelism enters only through the `ParallelLayers` factory.

blocks.py (attention, MLP, one class and one `BLOCKS` entry per block type), norms.py (`NORMS`),
layers.py (the tensor-parallel layer factory), gpt.py (the model or a pipeline chunk), build.py
(`build_model`), shapes.py (meta-device builds: parameter counts and shapes without memory).

This file imports nothing: ofs_scale.config reads the block and norm registries, and importing
them must not pull in megatron-core (layers.py) or the model.
"""
