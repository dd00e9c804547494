"""Optional C accelerators, built by ``pip install -e .`` (or ``pip install .``) next to their Python twins.

Each accelerator has a pure-Python twin that computes the same thing and is what runs when the
extension is absent (no C compiler, an unusual platform): ``optional=True`` lets the install go on
without it. The tests run both and compare them; in CI a missing accelerator is a failure
(``tests/test_accelerators.py``), so a build break cannot hide behind the fallback.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wno-unused-function"]

setup(
    ext_modules=[
        # indexes a batch of plain JSON documents straight into postings (percolators.fast_index)
        Extension("percolators._walk", ["percolators/_walk.c"], optional=True, extra_compile_args=_FLAGS),
        # evaluates compiled rule programs over a batch and scatters masks to lists (percolators.programs)
        Extension(
            "percolators._eval",
            ["percolators/_eval.c"],
            optional=True,
            extra_compile_args=_FLAGS,
            libraries=["m"],  # sin/cos/asin of the geo circle
        ),
        # aggregates per-rule document masks into counter updates (rules_service.counters.aggregate)
        Extension(
            "rules_service.counters._aggregate",
            ["rules_service/counters/_aggregate.c"],
            optional=True,
            extra_compile_args=_FLAGS,
        ),
        # packs a window's counter updates into the RESP commands of its Redis write (counters.redis_store)
        Extension(
            "rules_service.counters._encode",
            ["rules_service/counters/_encode.c"],
            optional=True,
            extra_compile_args=_FLAGS,
        ),
        # the happy path of turning a BidRequest into a user document (rules_service.normalize)
        Extension("rules_service._normalize", ["rules_service/_normalize.c"], optional=True, extra_compile_args=_FLAGS),
    ],
)
