"""From run records to reports: collect metrics.json files (`records`), choose λ and epochs by a
named rule (`selection`), expand the table presets' sweeps (`sweeps`), build the paper tables
beside the paper's numbers (`tables`, `paper_numbers`) and the λ figures (`figures`).
One command line: `python -m cdep_exp.reporting --help`."""
