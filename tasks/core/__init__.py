"""What every stage shares: settings, the run's scope, output, commands, errors, files, addresses."""
