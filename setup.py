from setuptools import find_packages, setup

setup(
    name="segment_anything_fast",
    version="0.1.0",
    description="A drop-in, much faster Segment Anything (SAM) for GPUs.",
    python_requires=">=3.10",
    packages=find_packages(include=["segment_anything_fast", "segment_anything_fast.*"]),
    package_data={"segment_anything_fast": ["assets/*"]},
    install_requires=[
        "torch>=2.4",
        "torchao>=0.10",
        "triton; platform_system=='Linux'",
        "numpy",
        "pillow",
        "opencv-python",
        "pycocotools",
        "tqdm",
    ],
    extras_require={
        # The original package and torchvision are the test oracle only.
        "test": ["pytest", "hypothesis", "segment-anything==1.0", "torchvision==0.29.1"],
    },
)
