"""Client library for the diffusion models served by this repository (over tritonclient)."""

from .api import DiffusionClient, GenerationRequest, GenerationResult, ServerError  # noqa: F401
