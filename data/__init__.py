"""Places with positions: dataset readers (`datasets`), the one way a user names
a dataset (`spec`: `KIND:PATH` + options), dvgl `@UTM@` file names (`names`),
the synthetic route, video + GPS conversion and UTM geometry (`geo`).

Imports `model/` and `media/` only (see docs/ARCHITECTURE.md).
"""
