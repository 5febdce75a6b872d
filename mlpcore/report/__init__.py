"""What a run shows: numbers, files and figures, all drawn from the results.json document.

- :mod:`~mlpcore.report.metrics` - accuracy, confusion matrix, classification report, speed-up.
- :mod:`~mlpcore.report.console` - the console summary and the ``--compare`` table.
- :mod:`~mlpcore.report.markdown` - report.md.
- :mod:`~mlpcore.report.figures` - confusion matrices, the task graph, the compare plot.
- :mod:`~mlpcore.report.trace` - trace.json (Perfetto) and the per-rank timeline.
- :mod:`~mlpcore.report.write` - writes all of a run's files into its folder.
"""
