"""The job kinds: one module per kind, each with its parameter checks (run once, at submit) and
its body ``run(ctx)`` (on every rank; ``launch.worker.JobContext``), registered by string target in
``launch.registry.KINDS``. Kinds whose bodies are benchmarks point at ``bench`` by that string,
so launch never imports bench: only the worker loads the target, inside the ranks.
"""
