"""The executors of batch plans, one per backend: the in-memory torch executor, DALI and FFCV. Each imports
its heavy library inside its own module, so `import mixtail.pipelines` works on any machine; the one
`Loader` (pipelines/loader.py) drives whichever `data.backend` names."""
