"""Training-data influence for TensorFlow/Keras models on Apache Beam."""

from setuptools import find_packages, setup

setup(
    name="beam-influence",
    version="0.1.0",
    description="Training-data influence (influence functions, RelatIF, TracIn, representer "
                "points, group influence) for Keras models as an Apache Beam pipeline",
    packages=find_packages(include=["influence_ops", "influence_ops.*", "pipelines",
                                    "pipelines.*"]),
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
