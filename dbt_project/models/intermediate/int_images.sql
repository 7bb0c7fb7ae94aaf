-- Every image with its split. The split is a pure function of image_id (md5 bucket 0-99), so an
-- image keeps its split forever, whatever else lands.
with bucketed as (
    select
        *,
        cast(md5_number(image_id) % 100 as integer) as split_bucket
    from {{ ref('stg_images') }}
)

select
    *,
    case
        when split_bucket < {{ var('train_percent') }} then 'train'
        when split_bucket < {{ var('train_percent') + var('val_percent') }} then 'val'
        else 'test'
    end as split
from bucketed
