-- One row per accepted landed image, without the image bytes (later stages join them when needed).
select
    image_id,
    batch_id,
    label,
    captured_at,
    content_hash,
    format,
    mode,
    width,
    height,
    brightness,
    contrast,
    ink_fraction,
    edge_strength,
    centroid_x,
    centroid_y,
    orientation,
    metadata,
    ingested_at
from {{ source('flywheel', 'raw_images') }}
