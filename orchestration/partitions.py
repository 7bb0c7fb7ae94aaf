"""One dynamic partition per landing batch file (`landing/<batch_id>.parquet`)."""

import dagster as dg

batch_partitions = dg.DynamicPartitionsDefinition(name="batches")
