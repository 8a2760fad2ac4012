"""Training-data influence for TensorFlow/Keras models on Apache Beam."""

from setuptools import Extension, find_packages, setup

setup(
    name="beam-influence",
    version="0.1.0",
    description="Training-data influence (influence functions, RelatIF, TracIn, representer "
                "points, group influence) for Keras models as an Apache Beam pipeline",
    packages=find_packages(include=["influence_ops", "influence_ops.*", "pipelines",
                                    "pipelines.*"]),
    # The top-k's one-pass scan (influence_ops/topk.py). Optional: without a C compiler the
    # install still succeeds (setuptools warns) and topk.py uses its numpy path instead.
    # Plain C with the buffer protocol, so building needs no numpy headers; -O3 for the
    # vectorised compares (the AVX2 clone is picked at run time, no -march=native).
    ext_modules=[Extension("influence_ops._topk_scan", ["influence_ops/_topk_scan.c"],
                           extra_compile_args=["-O3"], optional=True)],
    python_requires=">=3.10",
    install_requires=[
        "apache-beam[gcp]>=2.60",
        "tensorflow>=2.16",
        "tensorflow-datasets>=4.9",
        "pyarrow>=14",
        "numpy>=1.26",
        "scipy>=1.10",
        "google-cloud-storage>=2.10",
        "matplotlib>=3.7",  # the audit report (inline SVG plots)
    ],
    extras_require={
        # CI and laptops: the CPU build of TensorFlow (no multi-GB CUDA wheels).
        "cpu": ["tensorflow-cpu>=2.16"],
        "test": ["pytest>=7", "scikit-learn>=1.3", "pandas>=2"],
        "demo": ["scikit-learn>=1.3"],
    },
    entry_points={"console_scripts": [
        "beam-influence=pipelines.cli:main",
        "beam-influence-demo=pipelines.demo:main",
    ]},
)
