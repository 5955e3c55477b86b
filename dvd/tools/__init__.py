"""Developer tools that build checkpoints: random-weight InternVL checkpoints (`make_checkpoint`, the
`dvd make-checkpoint` command), the offline tokenizer they carry (`tokenizer_builder`), and the cache of
preset checkpoints built once (`checkpoint_cache`: benchmarks, `dvd serve` without `--model`).

Above the core, beside the transport: the gateway's commands, deploy and the benchmarks may import it;
the servers never do (pyproject's import-linter contracts).
"""
