-- Labeled images, the rows models train, validate and test on.
select
    image_id,
    batch_id,
    label,
    split,
    captured_at
from {{ ref('int_images') }}
where label is not null
