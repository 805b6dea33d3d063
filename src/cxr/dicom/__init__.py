"""The DICOM node: a Storage SCP that answers radiographs with structured reports
(:mod:`cxr.dicom.node`), its checks, spool, reports and forwarding."""
