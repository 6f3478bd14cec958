"""What a sweep's results say: statistics over seeds, the best configuration and trial, the summary, the HTML report,
`ltsweep compare` and their figures."""
