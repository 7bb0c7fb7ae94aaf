-- Labeled images, the rows models train, validate and test on. Narrow (no pixels), so rebuilding
-- it whole stays cheap; the FFCV writer joins the image bytes from raw_images.
select
    image_id,
    batch_id,
    label,
    label_source,
    split,
    captured_at
from {{ ref('int_images') }}
where label is not null
