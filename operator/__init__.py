"""The kopf operator for LLMDeployment resources (imports neither runtime nor kernels).

This folder is installed as `kubellm.operator`; it must never shadow the
standard library's `operator` module (tests/test_layout.py checks that).
"""
