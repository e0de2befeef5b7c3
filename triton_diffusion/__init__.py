"""Serve Hugging Face diffusers pipelines on Triton Inference Server with dynamic batching.

Data flows one way: Triton request -> ``requests.parse_request`` (rows with their ``CallParams``)
-> ``executor.Executor`` (``batching.plan_batches``, one ``pipeline.PipelineRunner.run`` per chunk,
out-of-memory halving, one outcome per request) -> Triton responses (``backend``). What a model
accepts is read from its ``config.pbtxt`` (``schema``, ``settings``).
"""

__version__ = "0.1.0"
