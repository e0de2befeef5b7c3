"""Client library for the diffusion models served by this repository (over tritonclient)."""

from .aio import AsyncDiffusionClient  # noqa: F401
from .api import DiffusionClient, GenerationRequest, GenerationResult, RetryPolicy, ServerError  # noqa: F401
