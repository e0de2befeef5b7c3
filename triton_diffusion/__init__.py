"""Serve Hugging Face diffusers pipelines on Triton Inference Server with dynamic batching.

Data flows one way: Triton request -> ``requests.parse_request`` -> ``batching.plan_batches`` ->
``pipeline.PipelineRunner.run`` -> ``batching`` splits results -> Triton responses (``backend``).
"""

__version__ = "0.1.0"
