"""Serve Hugging Face diffusers pipelines on Triton Inference Server with dynamic or continuous batching.

Data flows one way: Triton request -> ``requests.parse_request`` (rows with their ``CallParams``)
-> ``core.admit`` -> ``executor.Executor`` (dynamic: ``batching.plan_batches``, one
``pipeline.PipelineRunner.run`` per chunk, out-of-memory halving) or ``continuous.ContinuousBatcher``
(rows join a running batch of the family's step adapter) -> one ``core`` outcome per request ->
Triton responses (``backend``). What a model accepts is read from its ``config.pbtxt``
(``schema``, ``settings``); what differs between diffusers families, from ``families``.
"""

__version__ = "0.1.0"
