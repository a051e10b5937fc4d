"""vpr-distill: online visual place recognition that stays accurate on low-quality queries.

The one import name of the project. Its packages live at the repository root
(`model/`, `index/`, `server/`, ...) and are linked here, so that `vpr.model`,
`vpr.index`, ... are what gets installed and imported. docs/ARCHITECTURE.md
says which package may import which.
"""

__version__ = "0.1.0"
