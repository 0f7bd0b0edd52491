"""The wheel carries the SQL views and example queries inside the package (atlas/sql/).

Their source stays at the repository's top level, `sql/`, where users read and edit them; an editable
install reads them there (atlas/store/__init__.py looks for the packaged copy first).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSQL(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads ../sql from the source tree
        source = Path(__file__).resolve().parent / "sql"
        target = Path(self.build_lib) / "atlas" / "sql"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*~", ".*"))


setup(cmdclass={"build_py": BuildPyWithSQL})
