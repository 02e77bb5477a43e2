"""Installs dpdmd_torchvision_cpu_ops.py and its .pth (see the module's docstring); test-only."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildWithPth(build_py):
    """A .pth file must sit at the top of site-packages, where setuptools puts top-level modules."""

    def run(self):
        super().run()
        shutil.copy(os.path.join(HERE, "dpdmd_torchvision_cpu_ops.pth"), self.build_lib)


setup(name="dpdmd-torchvision-cpu-ops", version="1.0", py_modules=["dpdmd_torchvision_cpu_ops"],
      cmdclass={"build_py": BuildWithPth})
