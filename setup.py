"""Build hook: the wheel carries the top-level schemas/ as proxy/schemas/.

schemas/ stays the one copy in git (editors, CI and the docs point at it); when the package
is built, its *.json files are copied into the package so that an installed payswitch reads
them with importlib.resources. Everything else is configured in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithSchemas(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "proxy" / "schemas"
        self.mkpath(str(target))
        for source in sorted(Path("schemas").glob("*.json")):
            self.copy_file(str(source), str(target / source.name))


setup(cmdclass={"build_py": BuildWithSchemas})
