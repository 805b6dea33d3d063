"""What the tests and the benchmarks share and the wheel does not ship: generated test
material (``media``: awkward images, DICOM files, untrained bundles) and the outside services
some tests start (``services``: free ports, Orthanc, PostgreSQL).

Imported as ``support`` (pytest puts ``tests/`` on ``sys.path``; the benchmarks reach it
through ``benchmarks/support``)."""
