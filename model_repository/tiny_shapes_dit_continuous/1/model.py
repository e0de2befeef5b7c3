"""Triton entry point. All logic lives in the triton_diffusion package; knobs live in config.pbtxt."""

from triton_diffusion.backend import TritonPythonModel  # noqa: F401
