"""The registered benchmark cases. Importing this package registers them, in report order.

To add a case, write a module here that calls :func:`benchmarks.registry.register_case`
and import it below; the runner, the report and the regression gate pick it up.
"""

from . import encoder, ops, pretraining, real_lengths, sampler  # noqa: F401  (registration)
