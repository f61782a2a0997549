"""The benchmark scripts, run from the repository root as modules: ``python -m bench.inference`` etc.

Their shared set-up (options, input checks, the table-writing tail) lives in ``bench.report``.
"""
