"""The graded gate (policy ``evaluation = "tests"``): a change counts only when its tests prove it.

``junit.py`` reads the report a test run wrote (untrusted input), ``coverage.py`` its line and branch
coverage, ``layers.py`` splits a change into test and code paths and builds the *tests only* layer,
``cache.py`` keeps *before* runs per repository state, ``rules.py`` grades the runs, ``gate.py`` runs them.
"""
