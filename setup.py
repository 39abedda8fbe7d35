"""Package layout: the top-level folders install as one namespace.

``runtime/``, ``trainer/`` and ``export/`` stay where the design card puts them, but they
install as ``edge_inspect.runtime``, ``edge_inspect.trainer`` and ``edge_inspect.export``
(PyPI has distributions named ``runtime`` and ``export``; bare names in site-packages
would collide). ``edge_inspect`` itself is an implicit namespace package. The package list
is found here rather than typed into pyproject.toml, so a new subpackage (a method under
``trainer/heads/``) is picked up without a second edit. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

LAYERS = ("runtime", "trainer", "export")

packages = [f"edge_inspect.{layer}" for layer in LAYERS]
packages += [f"edge_inspect.{layer}.{sub}" for layer in LAYERS for sub in find_packages(layer)]
setup(packages=packages, package_dir={f"edge_inspect.{layer}": layer for layer in LAYERS})
