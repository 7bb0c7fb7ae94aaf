-- Late labels, one per image.
select
    image_id,
    label,
    label_file,
    labeled_at
from {{ source('flywheel', 'raw_labels') }}
