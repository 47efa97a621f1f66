"""The report's sections, one module per theme; each adds its blocks to a
:class:`pipeline.report.document.Doc` from a :class:`pipeline.report.sections.inputs.ReportInputs`."""
