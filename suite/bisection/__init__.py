"""Bisection's parts (the CLI is ``suite.bisect``): one step on one kernel (``step``), one ``git bisect run`` step
on your tree (``tree``), and fetching the next steps' kernels meanwhile (``prefetch``)."""
